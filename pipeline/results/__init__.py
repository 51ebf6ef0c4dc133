"""The reading side: the lazy reader, inspect, verify, plots and statistics of a result file."""
