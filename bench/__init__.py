"""Benchmarks of ragbeam; `measure` and `generate` are also used by the memory tests."""
# Before any benchmark imports Beam: importing the pipeline package silences the two
# FutureWarnings that Beam 2.62's GCP client libraries print at import, which otherwise top
# every benchmark's output.
import pipeline

del pipeline  # only its import was wanted
