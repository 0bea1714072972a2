import gc
import sys

# Off while the exporter starts (cli.main turns it back on once the start is done): see cli.main.
gc.disable()

from exporter.cli import main  # noqa: E402

sys.exit(main())
