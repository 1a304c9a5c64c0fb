from vecsim.cli import main

main()
