// kvbounce: the command-line tool (docs/architecture.md §13). See tools/cli.h.
#include <iostream>

#include "tools/cli.h"

int main(int argc, char** argv) {
  return kvbounce::tools::RunCli(argc, argv, std::cout, std::cerr);
}
