"""The workspace: the folder a user works in (cwd, `--workspace DIR` or FLATDINO_WORKSPACE), by job:
paths (its root and the default folders of new runs and stores), index (the runs and stores a scan
finds, cached in .flatdino/index.json), settings (.flatdino/settings.json), pick (the input a command
was left without, named in one line) and listing (the `flatdino workspace` table)."""
