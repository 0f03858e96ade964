from ollamamq_fast.cli import main

raise SystemExit(main())
