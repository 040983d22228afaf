"""ragbeam's driver: command line, options and pipeline construction."""
import warnings

# Beam 2.62's GCP client libraries warn at import about this machine's Python and grpcio
# versions (FutureWarning, once per library); they say nothing about a run, and would sit
# above every one-line error.
for _message in ('You are using a Python version', r'grpcio < \d'):
    warnings.filterwarnings('ignore', message=_message, category=FutureWarning)
