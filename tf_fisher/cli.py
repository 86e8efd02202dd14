"""Command-line helpers shared by the programs of tf_fisher.

Every program exits with status 2 on invalid input, whether a flag or an
argument is wrong, and prints an error that names the value and the fix.
"""

import sys

from absl import flags


def parse_flags(argv, flag_values=flags.FLAGS):
    """Parse the command line into `flag_values`, as `absl.app.run` does.

    On an invalid flag value, print the error and exit with status 2 instead
    of absl's status 1 and its full usage text.

    After --help, --helpshort or --helpfull has printed the help, exit
    with status 0, where absl exits with status 1.
    """
    try:
        return flag_values(argv)
    except flags.Error as error:
        print(
            f"Error: {error}\nRun with --helpshort to list the flags.",
            file=sys.stderr,
        )
        sys.exit(2)
    except SystemExit as exit_request:
        # absl's help flags print the help, then exit with status 1. A flag
        # error is raised as flags.Error above, so status 1 means help.
        if exit_request.code == 1:
            sys.exit(0)
        raise


def check_arguments(argv, count, usage):
    """Return True when `argv` contains `count` arguments after the program.

    Otherwise print which arguments were unexpected or missing, and `usage`,
    so that the caller can return status 2.
    """
    arguments = argv[1:]
    if len(arguments) == count:
        return True
    if len(arguments) > count:
        problem = f"unexpected arguments: {' '.join(arguments[count:])}"
    else:
        problem = "missing arguments"
    print(
        f"Error: {problem}. Usage: {usage}\nRun with --helpshort to list "
        "the flags.",
        file=sys.stderr,
    )
    return False
