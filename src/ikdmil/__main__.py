from ikdmil.cli import main

raise SystemExit(main())
