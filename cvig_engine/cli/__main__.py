from cvig_engine.cli import main

main()
