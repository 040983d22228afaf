"""The committed corpus under --output: the Delta Lake tables chunks/ and manifest/, what
changed since their last commit, and the one commit that publishes a run.

- `options`: the backfill options (what a run into a committed corpus redoes);
- `diff`: the listing in URI ranges on the workers, each merged with the committed
  manifest's rows of the same range (`Diff`);
- `files` and `layout`: the tables' files, and how a commit rewrites only those that hold
  a change;
- `staged`: the manifest rows of the objects a run read, merged and sorted without holding
  them all (`StagedManifest`), and checked against its chunk files (`check_staged`);
- `table`: `Corpus`, which owns the commit, the roll-forward after a crash, the cleanup of
  staging and the upkeep of the logs;
- `hooks`: the tests' crash and delay points.
"""
from transforms.corpus.diff import (Change, Changes, Diff, KeyRange, ManifestAt, RangeStats,
                                    scope_matcher, scopes)
from transforms.corpus.hooks import CRASH_ENV, DELAY_ENV, crash_point
from transforms.corpus.layout import MANIFEST_FILE_ROWS, remove_objects
from transforms.corpus.options import BackfillOptions, fingerprint, in_window
from transforms.corpus.staged import StagedManifest, check_staged
from transforms.corpus.table import (CHECKPOINT_INTERVAL, COPIES_KEY, CommitError,
                                     CommitResult, Corpus, StagedRun, copied_files, new_run_id,
                                     run_age, staging, table_relpath)

__all__ = ['BackfillOptions', 'CHECKPOINT_INTERVAL', 'COPIES_KEY', 'CRASH_ENV', 'Change',
           'Changes', 'CommitError', 'CommitResult', 'Corpus', 'DELAY_ENV', 'Diff', 'KeyRange',
           'MANIFEST_FILE_ROWS', 'ManifestAt', 'RangeStats', 'StagedManifest', 'StagedRun',
           'check_staged', 'copied_files', 'crash_point', 'fingerprint', 'in_window', 'new_run_id',
           'remove_objects', 'run_age', 'scope_matcher', 'scopes', 'staging', 'table_relpath']
