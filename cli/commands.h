// The subcommands that use the engine without FUSE: cat, info, verify and bundle.
// Each returns the process exit code (0 ok, 1 failure, 2 bad arguments) and reports on stderr.
#pragma once

#include <string>
#include <vector>

namespace imgfs::cli {

// imgfs cat PATH [--key PEM]... [--verify-cert CERT] [--offset N] [--length N]
// PATH names a bundle by its image path (PATH.manifest.xml beside it), or a plain file.
int run_cat_command(const std::vector<std::string>& args);

// imgfs info PATH [--key PEM]...: the manifest's fields, and which key unwraps it.
int run_info_command(const std::vector<std::string>& args);

// imgfs verify PATH --key PEM...: reads the whole bundle, checking every part's SHA1, the gzip
// CRC32 and length, and the tar stream's SHA1 against the manifest.
int run_verify_command(const std::vector<std::string>& args);

// imgfs bundle IMAGE --cert CERT [--user-cert CERT --user-key KEY] [--prefix P]
//              [--part-size N] -d OUTDIR
int run_bundle_command(const std::vector<std::string>& args);

}  // namespace imgfs::cli
