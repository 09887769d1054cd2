try:
    from harness.driver.cli import entry
except KeyboardInterrupt:  # Ctrl-C while Python itself starts up
    import sys

    print("ftbench: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

entry()
