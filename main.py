"""Entry point: ``python main.py [serve|run|status|reprocess|resend|receiver|models]``."""

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main())
