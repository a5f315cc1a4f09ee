from streamtrain.server.cli import main

raise SystemExit(main())
