#include "fusefs/store_factory.h"

#include <cstdlib>
#include <filesystem>

#include "remote/credentials.h"
#include "remote/dir_store.h"
#include "remote/s3_store.h"

namespace imgfs::fusefs {

Result<OpenedStore> open_store(const MountOptions& options) {
  auto s3 = parse_s3_location(options.source);
  if (!s3.ok()) return s3.status();
  OpenedStore opened;
  if (!s3->has_value()) {
    std::string path = options.source;
    if (path.rfind("file://", 0) == 0) path = path.substr(7);
    std::error_code ec;
    const auto absolute = std::filesystem::absolute(path, ec);
    auto store = remote::DirStore::open(ec ? path : absolute.lexically_normal().string());
    if (!store.ok()) return store.status();
    opened.store = std::move(store).value();
    return opened;
  }

  remote::S3Config config;
  config.bucket = (*s3)->bucket;
  config.endpoints = options.endpoints;
  config.signing = options.no_sign ? remote::S3Config::Signing::kNone
                   : options.sigv2 ? remote::S3Config::Signing::kV2
                                   : remote::S3Config::Signing::kV4;
  config.path_style = options.path_style;
  config.ca_file = options.ca_file;
  config.insecure = options.insecure;
  config.max_connections = options.max_connections;
  config.retries = options.retries;
  config.timeout_ms = options.timeout_seconds * 1000;
  // The whole retry budget of one operation: enough for every attempt to time out once.
  config.retry_budget_ms = config.timeout_ms * static_cast<uint32_t>(options.retries + 1);

  std::optional<std::string> config_region;
  if (!options.no_sign) {
    remote::CredentialSources sources;
    sources.credentials_file = options.credentials_file;
    sources.profile = options.profile;
    sources.bucket = config.bucket;
    sources.environment = remote::environment_of_process();
    if (const char* home = std::getenv("HOME"); home != nullptr) sources.home_dir = home;
    auto found = remote::find_credentials(sources);
    if (!found.ok()) {
      return found.status().with_context("S3 credentials (use --no-sign for a public bucket)");
    }
    config.credentials = found->credentials;
    config_region = found->region;
    opened.credential_source = found->source;
  }
  config.region = options.region.value_or(config_region.value_or("us-east-1"));
  if (config.endpoints.empty()) {
    config.endpoints.push_back("https://s3." + config.region + ".amazonaws.com");
  }
  auto store = remote::S3Store::open(config);
  if (!store.ok()) return store.status();
  const remote::S3Store* s3_store = store->get();
  opened.stats = [s3_store] {
    return "\"endpoint\":\"" + s3_store->current_endpoint() +
           "\",\"failovers\":" + std::to_string(s3_store->failovers());
  };
  opened.store = std::move(store).value();
  opened.prefix = (*s3)->prefix;
  return opened;
}

}  // namespace imgfs::fusefs
