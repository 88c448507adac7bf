from llamalocal.cli import entry

entry()
