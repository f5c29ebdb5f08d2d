from modelkit.cli import main

main()
