"""`python -m kto_lite COMMAND ...`: the commands are kto_lite/commands/, one module each."""

import sys

from kto_lite.commands import main

if __name__ == "__main__":
    sys.exit(main())
