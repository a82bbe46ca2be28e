from megatron_p2t.cli import main

if __name__ == "__main__":  # spawned helper processes (e.g. checkpoint writers) re-import __main__
    raise SystemExit(main())
