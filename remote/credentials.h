// Credentials: turns the places a user keeps S3 keys (an s3fs-style file, the environment,
// ~/.aws/credentials and ~/.aws/config) into one access key, secret and session token, plus the
// profile's region. The first source that has keys wins. The environment and home directory
// are passed in, so the lookup is testable and reads no process state of its own.
#pragma once

#include <map>
#include <optional>
#include <string>

#include "formats/status.h"

namespace imgfs::remote {

struct Credentials {
  std::string access_key_id;
  std::string secret_access_key;  // never logged, never in an error message
  std::string session_token;      // empty unless temporary credentials

  bool empty() const { return access_key_id.empty(); }
};

// Where to look.
struct CredentialSources {
  // --credentials FILE: s3fs's passwd format, lines "ACCESS:SECRET" or "BUCKET:ACCESS:SECRET",
  // '#' comments. Must not be readable or writable by group or others.
  std::optional<std::string> credentials_file;
  // --profile; else AWS_PROFILE; else "default".
  std::optional<std::string> profile;
  // Picks a "BUCKET:ACCESS:SECRET" line of the credentials file over a plain one.
  std::string bucket;
  // The process environment (see environment_of_process()).
  std::map<std::string, std::string> environment;
  // $HOME; empty skips the ~/.aws files (unless AWS_SHARED_CREDENTIALS_FILE/AWS_CONFIG_FILE).
  std::string home_dir;
};

struct FoundCredentials {
  Credentials credentials;
  // "credentials file F", "environment (AWS_ACCESS_KEY_ID)", "profile P in F": for logs.
  std::string source;
  // From AWS_REGION / AWS_DEFAULT_REGION, else the profile's "region" in the config file.
  std::optional<std::string> region;
};

// Looks in order: credentials_file; AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY
// (+ AWS_SESSION_TOKEN); EC2_ACCESS_KEY + EC2_SECRET_KEY (euca2ools); the profile in
// AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials ("[NAME]"), then in AWS_CONFIG_FILE or
// ~/.aws/config ("[profile NAME]", or "[default]"). Reads only files. Thread-safe.
// Errors: InvalidArgument (credentials file with group/other permissions, malformed, half a
// key pair in the environment, a profile that was asked for by name but exists nowhere),
// NotFound (no source has credentials; the message lists where it looked), IOError (a named
// file cannot be read). No message ever contains a secret.
Result<FoundCredentials> find_credentials(const CredentialSources& sources);

// The current process's environment as a map (reads `environ`). Not thread-safe with setenv.
std::map<std::string, std::string> environment_of_process();

}  // namespace imgfs::remote
