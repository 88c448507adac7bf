from llamalocal.cli import main

main()
