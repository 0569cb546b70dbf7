from lit_opd.cli import main

main()
