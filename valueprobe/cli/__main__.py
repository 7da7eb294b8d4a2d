from valueprobe.cli import main

main()
