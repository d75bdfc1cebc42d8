#include "remote/credentials.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <string_view>
#include <system_error>
#include <vector>

extern char** environ;

namespace imgfs::remote {

namespace {

// Credential files are a few lines; a bigger one is not a credentials file.
constexpr off_t kMaxFileBytes = 1 << 20;

std::string errno_text(int error) {
  return std::error_code(error, std::generic_category()).message();
}

std::string_view trim(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t' || text.front() == '\r')) {
    text.remove_prefix(1);
  }
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t' || text.back() == '\r')) {
    text.remove_suffix(1);
  }
  return text;
}

std::vector<std::string_view> split_lines(std::string_view text) {
  std::vector<std::string_view> lines;
  while (!text.empty()) {
    const size_t end = text.find('\n');
    lines.push_back(text.substr(0, end));
    if (end == std::string_view::npos) break;
    text.remove_prefix(end + 1);
  }
  return lines;
}

const std::string* lookup(const std::map<std::string, std::string>& env, const std::string& name) {
  const auto it = env.find(name);
  return it == env.end() || it->second.empty() ? nullptr : &it->second;
}

enum class FileState { kRead, kMissing };

// Reads a small regular file. With `private_only`, refuses one that group or others may read
// or write, as s3fs does for its passwd file.
Result<FileState> read_small_file(const std::string& path, bool private_only, std::string* out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    const int error = errno;
    if (error == ENOENT) return FileState::kMissing;
    return Status::IOError("cannot open " + path + ": " + errno_text(error));
  }
  struct stat st;
  Status status;
  if (::fstat(fd, &st) != 0) {
    status = Status::IOError("cannot stat " + path + ": " + errno_text(errno));
  } else if (!S_ISREG(st.st_mode)) {
    status = Status::InvalidArgument(path + " is not a regular file");
  } else if (private_only && (st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    status = Status::InvalidArgument("credentials file " + path + " has mode " + mode +
                                     "; it must not be accessible by group or others "
                                     "(chmod 600 " +
                                     path + ")");
  } else if (st.st_size > kMaxFileBytes) {
    status = Status::InvalidArgument(path + " is too large to be a credentials file");
  }
  if (!status.ok()) {
    ::close(fd);
    return status;
  }
  out->clear();
  char buffer[4096];
  while (true) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int error = errno;
      ::close(fd);
      return Status::IOError("cannot read " + path + ": " + errno_text(error));
    }
    if (n == 0) break;
    out->append(buffer, static_cast<size_t>(n));
    if (out->size() > static_cast<size_t>(kMaxFileBytes)) {
      ::close(fd);
      return Status::InvalidArgument(path + " is too large to be a credentials file");
    }
  }
  ::close(fd);
  return FileState::kRead;
}

// s3fs passwd: "ACCESS:SECRET" or "BUCKET:ACCESS:SECRET"; a line for `bucket` wins.
// Errors name the line number only, never its content (it holds a secret).
Result<Credentials> parse_s3fs_file(std::string_view text, const std::string& bucket,
                                    const std::string& path) {
  std::optional<Credentials> plain;
  std::optional<Credentials> for_bucket;
  int line_number = 0;
  for (std::string_view line : split_lines(text)) {
    ++line_number;
    line = trim(line);
    if (line.empty() || line.front() == '#') continue;
    std::vector<std::string_view> fields;
    while (true) {
      const size_t colon = line.find(':');
      fields.push_back(line.substr(0, colon));
      if (colon == std::string_view::npos) break;
      line.remove_prefix(colon + 1);
    }
    const bool has_bucket = fields.size() == 3;
    if ((fields.size() != 2 && !has_bucket) || fields[fields.size() - 2].empty() ||
        fields.back().empty()) {
      return Status::InvalidArgument("credentials file " + path + " line " +
                                     std::to_string(line_number) +
                                     ": expected ACCESS_KEY:SECRET or BUCKET:ACCESS_KEY:SECRET");
    }
    Credentials credentials;
    credentials.access_key_id = std::string(trim(fields[fields.size() - 2]));
    credentials.secret_access_key = std::string(trim(fields.back()));
    if (!has_bucket) {
      if (!plain) plain = std::move(credentials);
    } else if (!bucket.empty() && fields[0] == bucket && !for_bucket) {
      for_bucket = std::move(credentials);
    }
  }
  if (for_bucket) return *for_bucket;
  if (plain) return *plain;
  return Status::InvalidArgument("credentials file " + path + " has no ACCESS_KEY:SECRET line" +
                                 (bucket.empty() ? "" : " for bucket " + bucket));
}

// The key/value pairs of section `section` of an INI file (AWS shared files); nullopt when the
// section is absent. Later duplicates of a key win, as in the AWS CLI.
std::optional<std::map<std::string, std::string>> ini_section(std::string_view text,
                                                              std::string_view section) {
  std::optional<std::map<std::string, std::string>> found;
  bool inside = false;
  for (std::string_view line : split_lines(text)) {
    line = trim(line);
    if (line.empty() || line.front() == '#' || line.front() == ';') continue;
    if (line.front() == '[') {
      const size_t close = line.find(']');
      const std::string_view name =
          trim(line.substr(1, close == std::string_view::npos ? line.size() - 1 : close - 1));
      inside = name == section;
      if (inside && !found) found.emplace();
      continue;
    }
    if (!inside) continue;
    const size_t equals = line.find('=');
    if (equals == std::string_view::npos) continue;
    (*found)[std::string(trim(line.substr(0, equals)))] =
        std::string(trim(line.substr(equals + 1)));
  }
  return found;
}

std::optional<Credentials> credentials_in(const std::map<std::string, std::string>& values) {
  const auto key = values.find("aws_access_key_id");
  const auto secret = values.find("aws_secret_access_key");
  if (key == values.end() || secret == values.end() || key->second.empty() ||
      secret->second.empty()) {
    return std::nullopt;
  }
  Credentials credentials;
  credentials.access_key_id = key->second;
  credentials.secret_access_key = secret->second;
  const auto token = values.find("aws_session_token");
  if (token != values.end()) credentials.session_token = token->second;
  return credentials;
}

}  // namespace

Result<FoundCredentials> find_credentials(const CredentialSources& sources) {
  const auto& env = sources.environment;
  FoundCredentials found;
  if (const std::string* region = lookup(env, "AWS_REGION")) {
    found.region = *region;
  } else if (const std::string* default_region = lookup(env, "AWS_DEFAULT_REGION")) {
    found.region = *default_region;
  }

  std::string profile = "default";
  const bool profile_named = sources.profile.has_value() || lookup(env, "AWS_PROFILE") != nullptr;
  if (sources.profile) {
    profile = *sources.profile;
  } else if (const std::string* from_env = lookup(env, "AWS_PROFILE")) {
    profile = *from_env;
  }

  std::string credentials_path;
  if (const std::string* path = lookup(env, "AWS_SHARED_CREDENTIALS_FILE")) {
    credentials_path = *path;
  } else if (!sources.home_dir.empty()) {
    credentials_path = sources.home_dir + "/.aws/credentials";
  }
  std::string config_path;
  if (const std::string* path = lookup(env, "AWS_CONFIG_FILE")) {
    config_path = *path;
  } else if (!sources.home_dir.empty()) {
    config_path = sources.home_dir + "/.aws/config";
  }

  // The config file gives the profile's region whatever source gives the keys.
  std::optional<std::map<std::string, std::string>> config_section;
  if (!config_path.empty()) {
    std::string text;
    Result<FileState> state = read_small_file(config_path, false, &text);
    if (!state.ok()) return state.status();
    if (*state == FileState::kRead) {
      config_section =
          ini_section(text, profile == "default" ? std::string("default") : "profile " + profile);
      if (!config_section && profile == "default")
        config_section = ini_section(text, "profile default");
      if (config_section && !found.region) {
        const auto region = config_section->find("region");
        if (region != config_section->end() && !region->second.empty()) {
          found.region = region->second;
        }
      }
    }
  }

  if (sources.credentials_file) {
    std::string text;
    Result<FileState> state = read_small_file(*sources.credentials_file, true, &text);
    if (!state.ok()) return state.status();
    if (*state == FileState::kMissing) {
      return Status::NotFound("credentials file " + *sources.credentials_file + " does not exist");
    }
    Result<Credentials> credentials =
        parse_s3fs_file(text, sources.bucket, *sources.credentials_file);
    if (!credentials.ok()) return credentials.status();
    found.credentials = std::move(*credentials);
    found.source = "credentials file " + *sources.credentials_file;
    return found;
  }

  const std::string* aws_key = lookup(env, "AWS_ACCESS_KEY_ID");
  const std::string* aws_secret = lookup(env, "AWS_SECRET_ACCESS_KEY");
  if ((aws_key == nullptr) != (aws_secret == nullptr)) {
    return Status::InvalidArgument(
        "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set; set both or neither");
  }
  if (aws_key != nullptr) {
    found.credentials.access_key_id = *aws_key;
    found.credentials.secret_access_key = *aws_secret;
    if (const std::string* token = lookup(env, "AWS_SESSION_TOKEN")) {
      found.credentials.session_token = *token;
    }
    found.source = "environment (AWS_ACCESS_KEY_ID)";
    return found;
  }
  const std::string* ec2_key = lookup(env, "EC2_ACCESS_KEY");
  const std::string* ec2_secret = lookup(env, "EC2_SECRET_KEY");
  if ((ec2_key == nullptr) != (ec2_secret == nullptr)) {
    return Status::InvalidArgument(
        "only one of EC2_ACCESS_KEY and EC2_SECRET_KEY is set; set both or neither");
  }
  if (ec2_key != nullptr) {
    found.credentials.access_key_id = *ec2_key;
    found.credentials.secret_access_key = *ec2_secret;
    found.source = "environment (EC2_ACCESS_KEY)";
    return found;
  }

  bool profile_seen = config_section.has_value();
  if (!credentials_path.empty()) {
    std::string text;
    Result<FileState> state = read_small_file(credentials_path, false, &text);
    if (!state.ok()) return state.status();
    if (*state == FileState::kRead) {
      const std::optional<std::map<std::string, std::string>> section = ini_section(text, profile);
      profile_seen = profile_seen || section.has_value();
      if (section) {
        if (std::optional<Credentials> credentials = credentials_in(*section)) {
          found.credentials = std::move(*credentials);
          found.source = "profile " + profile + " in " + credentials_path;
          return found;
        }
      }
    }
  }
  if (config_section) {
    if (std::optional<Credentials> credentials = credentials_in(*config_section)) {
      found.credentials = std::move(*credentials);
      found.source = "profile " + profile + " in " + config_path;
      return found;
    }
  }
  if (profile_named && !profile_seen) {
    return Status::InvalidArgument(
        "AWS profile '" + profile + "' not found in " +
        (credentials_path.empty() ? "(no credentials file)" : credentials_path) + " or " +
        (config_path.empty() ? "(no config file)" : config_path));
  }
  return Status::NotFound(
      "no S3 credentials found (looked at --credentials, AWS_ACCESS_KEY_ID, EC2_ACCESS_KEY, "
      "profile '" +
      profile + "' in " +
      (credentials_path.empty() ? std::string("(no home directory)") : credentials_path) + " and " +
      (config_path.empty() ? std::string("(no home directory)") : config_path) + ")");
}

std::map<std::string, std::string> environment_of_process() {
  std::map<std::string, std::string> env;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    const std::string_view text(*entry);
    const size_t equals = text.find('=');
    if (equals == std::string_view::npos) continue;
    env.emplace(std::string(text.substr(0, equals)), std::string(text.substr(equals + 1)));
  }
  return env;
}

}  // namespace imgfs::remote
