"""Command-line tools that read run folders: reports and benchmarks."""

import sys

# The modules that only `tools.report` runs, with what each one gives.
_LIBRARY_MODULES = {
    "tools.analysis": "tables, tests and rankings",
    "tools.claims": "checks of the paper's findings",
    "tools.figures": "figures",
    "tools.runs": "tables of the run folders",
}


def print_not_a_command(module):
    """Print an error on stderr that `module` is not a command, and return
    the exit status 2.

    `python -m tools.figures` would otherwise define its functions and exit
    0 without a word, as if it had written the figures.
    """
    print(
        f"Error: {module} is a library module, not a command. "
        f"`python -m tools.report RUNS_DIR` writes its "
        f"{_LIBRARY_MODULES[module]}, with the rest of the report, to "
        "RUNS_DIR/report.",
        file=sys.stderr,
    )
    return 2
