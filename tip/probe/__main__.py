from tip.probe.run import main

main()
