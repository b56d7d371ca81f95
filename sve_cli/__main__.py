from sve_cli.cli import main

main()
