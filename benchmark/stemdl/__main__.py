from stemdl.cli import main

raise SystemExit(main())
