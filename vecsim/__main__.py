from vecsim.cli import entry

entry()
