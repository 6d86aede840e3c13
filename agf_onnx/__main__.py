from agf_onnx.cli import main

raise SystemExit(main())
