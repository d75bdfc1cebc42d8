#include "remote/credentials.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

namespace imgfs::remote {
namespace {

class CredentialsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string templ = ::testing::TempDir() + "imgfs-credentials-XXXXXX";
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    home_ = templ;
    std::filesystem::create_directories(home_ + "/.aws");
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(home_, ec);
  }

  std::string write(const std::string& relative, const std::string& text, mode_t mode = 0600) {
    const std::string path = home_ + "/" + relative;
    std::ofstream(path) << text;
    ::chmod(path.c_str(), mode);
    return path;
  }

  CredentialSources sources() const {
    CredentialSources s;
    s.home_dir = home_;
    return s;
  }

  std::string home_;
};

TEST_F(CredentialsTest, NothingFound) {
  Result<FoundCredentials> found = find_credentials(sources());
  ASSERT_FALSE(found.ok());
  EXPECT_EQ(found.status().code(), StatusCode::kNotFound);
  EXPECT_NE(found.status().message().find(home_ + "/.aws/credentials"), std::string::npos);
}

TEST_F(CredentialsTest, ExplicitFileWinsAndNeedsMode600) {
  const std::string file = write("passwd", "# comment\nAKFILE:SECRETFILE\n", 0600);
  CredentialSources s = sources();
  s.credentials_file = file;
  s.environment = {{"AWS_ACCESS_KEY_ID", "AKENV"}, {"AWS_SECRET_ACCESS_KEY", "SECRETENV"}};
  Result<FoundCredentials> found = find_credentials(s);
  ASSERT_TRUE(found.ok()) << found.status().to_string();
  EXPECT_EQ(found->credentials.access_key_id, "AKFILE");
  EXPECT_EQ(found->credentials.secret_access_key, "SECRETFILE");
  EXPECT_EQ(found->source, "credentials file " + file);

  ::chmod(file.c_str(), 0400);
  EXPECT_TRUE(find_credentials(s).ok());

  for (mode_t mode : {0644, 0640, 0604, 0660}) {
    ::chmod(file.c_str(), mode);
    found = find_credentials(s);
    ASSERT_FALSE(found.ok()) << mode;
    EXPECT_EQ(found.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(found.status().message().find("chmod 600"), std::string::npos);
    EXPECT_EQ(found.status().message().find("SECRETFILE"), std::string::npos);
  }
}

TEST_F(CredentialsTest, ExplicitFileFormats) {
  CredentialSources s = sources();
  s.credentials_file = write("passwd", "other:AKOTHER:SOTHER\nAKPLAIN:SPLAIN\nmine:AKMINE:SMINE\n");
  s.bucket = "mine";
  Result<FoundCredentials> found = find_credentials(s);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->credentials.access_key_id, "AKMINE");
  s.bucket = "third";
  found = find_credentials(s);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->credentials.access_key_id, "AKPLAIN");

  s.credentials_file = write("bad", "AKONLY\n");
  found = find_credentials(s);
  ASSERT_FALSE(found.ok());
  EXPECT_EQ(found.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(found.status().message().find("line 1"), std::string::npos);
  EXPECT_EQ(found.status().message().find("AKONLY"), std::string::npos);

  s.credentials_file = write("bad2", "AK:SUPERSECRET:x:y\n");
  found = find_credentials(s);
  ASSERT_FALSE(found.ok());
  EXPECT_EQ(found.status().message().find("SUPERSECRET"), std::string::npos);

  s.credentials_file = home_ + "/missing";
  EXPECT_EQ(find_credentials(s).status().code(), StatusCode::kNotFound);
}

TEST_F(CredentialsTest, EnvironmentBeatsSharedFiles) {
  write(".aws/credentials", "[default]\naws_access_key_id = AKSHARED\naws_secret_access_key = S\n",
        0644);
  CredentialSources s = sources();
  s.environment = {{"AWS_ACCESS_KEY_ID", "AKENV"},
                   {"AWS_SECRET_ACCESS_KEY", "SECRETENV"},
                   {"AWS_SESSION_TOKEN", "TOKENENV"},
                   {"EC2_ACCESS_KEY", "AKEC2"},
                   {"EC2_SECRET_KEY", "SECRETEC2"}};
  Result<FoundCredentials> found = find_credentials(s);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->credentials.access_key_id, "AKENV");
  EXPECT_EQ(found->credentials.session_token, "TOKENENV");

  s.environment.erase("AWS_ACCESS_KEY_ID");
  found = find_credentials(s);
  ASSERT_FALSE(found.ok());
  EXPECT_EQ(found.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(found.status().message().find("SECRETENV"), std::string::npos);

  s.environment.erase("AWS_SECRET_ACCESS_KEY");
  found = find_credentials(s);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->credentials.access_key_id, "AKEC2");
  EXPECT_EQ(found->credentials.secret_access_key, "SECRETEC2");
  EXPECT_TRUE(found->credentials.session_token.empty());

  s.environment.clear();
  found = find_credentials(s);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->credentials.access_key_id, "AKSHARED");
}

TEST_F(CredentialsTest, SharedFilesWithProfilesAndRegion) {
  write(".aws/credentials",
        "[default]\naws_access_key_id=AKDEF\naws_secret_access_key=SDEF\n\n"
        "[work]\n# a comment\naws_access_key_id = AKWORK\naws_secret_access_key = SWORK\n"
        "aws_session_token = TWORK\n");
  write(".aws/config",
        "[default]\nregion = us-west-2\n[profile work]\nregion = eu-central-1\n"
        "[profile cfgonly]\naws_access_key_id = AKCFG\naws_secret_access_key = SCFG\n"
        "region = ap-south-1\n");
  CredentialSources s = sources();
  Result<FoundCredentials> found = find_credentials(s);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->credentials.access_key_id, "AKDEF");
  EXPECT_EQ(found->region, "us-west-2");

  s.environment = {{"AWS_PROFILE", "work"}};
  found = find_credentials(s);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->credentials.access_key_id, "AKWORK");
  EXPECT_EQ(found->credentials.session_token, "TWORK");
  EXPECT_EQ(found->region, "eu-central-1");
  EXPECT_EQ(found->source, "profile work in " + home_ + "/.aws/credentials");

  // --profile beats AWS_PROFILE; a profile may live in the config file alone.
  s.profile = "cfgonly";
  found = find_credentials(s);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->credentials.access_key_id, "AKCFG");
  EXPECT_EQ(found->region, "ap-south-1");

  // The environment's region beats the config's.
  s.environment["AWS_REGION"] = "sa-east-1";
  found = find_credentials(s);
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(found->region, "sa-east-1");

  s.profile = "nosuch";
  found = find_credentials(s);
  ASSERT_FALSE(found.ok());
  EXPECT_EQ(found.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(found.status().message().find("nosuch"), std::string::npos);
}

TEST_F(CredentialsTest, FileLocationsFromEnvironment) {
  const std::string creds = write("elsewhere",
                                  "[default]\naws_access_key_id=AKX\n"
                                  "aws_secret_access_key=SX\n");
  const std::string config = write("elsewhere-config", "[default]\nregion=eu-north-1\n");
  CredentialSources s;  // no home directory
  s.environment = {{"AWS_SHARED_CREDENTIALS_FILE", creds}, {"AWS_CONFIG_FILE", config}};
  Result<FoundCredentials> found = find_credentials(s);
  ASSERT_TRUE(found.ok()) << found.status().to_string();
  EXPECT_EQ(found->credentials.access_key_id, "AKX");
  EXPECT_EQ(found->region, "eu-north-1");
}

TEST_F(CredentialsTest, EnvironmentOfProcess) {
  ::setenv("IMGFS_CREDENTIALS_TEST_VAR", "a=b", 1);
  const std::map<std::string, std::string> env = environment_of_process();
  ASSERT_TRUE(env.contains("IMGFS_CREDENTIALS_TEST_VAR"));
  EXPECT_EQ(env.at("IMGFS_CREDENTIALS_TEST_VAR"), "a=b");
  ::unsetenv("IMGFS_CREDENTIALS_TEST_VAR");
}

}  // namespace
}  // namespace imgfs::remote
