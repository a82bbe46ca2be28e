from megatron_p2t.cli import main

raise SystemExit(main())
