// The `kvbounce` command line as a function, so that tests run it in-process
// exactly as the binary does (tools/main.cc only calls RunCli).
//
// Exit status: 0 success (and --help); 1 the bench ran and failed (a byte
// mismatched, an arena leaked, a request failed without an explanation, a
// chaos check found a violation, a worker process died or hung) or a worker
// failed (tools/worker_command.h); 2 an error: every bad flag — CLI11's parse
// errors included — and any error before or while setting up the run, each
// printed to `err` as one "kvbounce <command>: error: ..." line ("kvbounce:
// error: ..." before a command is known).
//
// Thread safety: one call at a time (the library's log level is global).
#ifndef KVBOUNCE_TOOLS_CLI_H_
#define KVBOUNCE_TOOLS_CLI_H_

#include <ostream>

namespace kvbounce::tools {

// Runs the command line `argv[0..argc)`. Output goes to `out`, errors to
// `err`. Never throws: an exception from anywhere below is reported as an
// error (status 2).
int RunCli(int argc, const char* const* argv, std::ostream& out, std::ostream& err);

}  // namespace kvbounce::tools

#endif  // KVBOUNCE_TOOLS_CLI_H_
