"""The orchestration floor: the CLI, pipeline plans and their runner, the report, ``kdens evaluate``.

The only code that imports stage packages, and only through ``kdens.app.stages`` (one table of
stage kinds). Nothing in the spine or in a stage imports this package.
"""
