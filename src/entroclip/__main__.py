from entroclip.cli import main

main()
