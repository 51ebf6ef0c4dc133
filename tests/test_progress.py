"""Log records and progress bars on one terminal: a record never lands inside a bar's line."""

import logging
import re
import sys

from pipeline.execution.progress import progress


def test_a_log_record_during_a_bar_starts_its_own_line(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # the console handler Hydra installs, on stderr
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    root.addHandler(handler)
    try:
        with progress(True, 4, 0, "blocks") as bar:
            bar.update(1)
            logging.getLogger("pipeline.test").warning("a record while the bar is drawn")
            bar.update(1)
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    lines = re.split(r"[\r\n]", err)
    records = [line for line in lines if "a record while the bar is drawn" in line]
    assert records == ["[pipeline.test] a record while the bar is drawn"], repr(err)
    assert root.handlers.count(handler) == 0 and handler not in root.handlers


def test_no_bar_is_silent(capsys):
    with progress(False, 4, 0, "blocks") as bar:
        bar.update(1)
    assert capsys.readouterr().err == ""
