"""Reports: the self-contained feature dashboard (``saeforge.report.dashboard``)."""
