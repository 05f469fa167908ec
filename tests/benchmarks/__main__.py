from tests.benchmarks.harness import main

main()
