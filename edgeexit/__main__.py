from edgeexit.cli import main

raise SystemExit(main())
