from convscope.cli.main import main

main()
