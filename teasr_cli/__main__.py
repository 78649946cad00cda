from teasr_cli.cli import main

main()
