"""The Dataflow Flex Template: its entry point and its parameters (dataflow/metadata.json).

Dataflow's launcher runs `python pipeline/flex.py --name=value ...`, one `--name=value` per
template parameter and per Dataflow option (--project, --temp_location, ...). A parameter is
a `ragbeam run` flag named with `_` for `-` (`chunk_size` for --chunk-size): Beam's own
options keep their names, and the launcher passes both kinds alike.

    python -m pipeline.flex --metadata > dataflow/metadata.json
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from pipeline.options import RunOptions, default_text, flags_by_name

# the two flags of `ragbeam run` that are not fields of RunOptions
_IO = {'input': ('--input', 'Objects to ingest: a gs://, s3:// or local pattern (`**` '
                 'crosses folders)'),
       'output': ('--output', 'The corpus: a gs:// or s3:// folder')}


def _parameters() -> dict[str, tuple[str, str, bool]]:
    """name -> (flag, help, takes no value) for every parameter."""
    found = {name: (flag, text, False) for name, (flag, text) in _IO.items()}
    for name, (flag, f, hint) in flags_by_name(RunOptions).items():
        found[name] = (flag, f"{f.metadata['help']} (default: {default_text(f)})", hint is bool)
    return found


def metadata() -> dict:
    """The template's metadata file: its name, and a parameter per `ragbeam run` flag."""
    return {
        'name': 'ragbeam',
        'description': 'Documents in a bucket to chunks, embeddings and indexes in Delta '
                       'tables; a re-run redoes only what changed',
        'parameters': [{'name': name, 'label': flag, 'helpText': text,
                        'isOptional': name not in _IO}
                       for name, (flag, text, _) in _parameters().items()],
    }


def run_argv(args: Sequence[str]) -> list[str]:
    """`ragbeam run` arguments from the launcher's: template parameters back to their flags
    (a switch given `true` is the bare flag, `false` leaves it out), the rest as they are."""
    parameters = _parameters()
    argv = ['run']
    for arg in args:
        name, _, value = arg[2:].partition('=')
        if not arg.startswith('--') or name not in parameters:
            argv.append(arg)
            continue
        flag, _, switch = parameters[name]
        if not switch:
            argv.append(f'{flag}={value}')
        elif value.lower() in ('', 'true'):
            argv.append(flag)
        elif value.lower() != 'false':
            raise SystemExit(f'ragbeam: error: {name}={value}: expected true or false')
    return argv


def main() -> int:
    if sys.argv[1:] == ['--metadata']:
        print(json.dumps(metadata(), indent=2))
        return 0
    from pipeline.cli import main as cli_main
    return cli_main(run_argv(sys.argv[1:]))


if __name__ == '__main__':
    sys.exit(main())
