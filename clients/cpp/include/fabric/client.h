// A small typed wrapper over the generated fabric.v1 stubs (gen/, never edited by hand). It adds what every
// caller needs: a deadline, a bearer token, TLS from a CA file, and per-item stream errors turned into
// fabric::Error (carrying a grpc::StatusCode), the same type a failed call throws.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "fabric/v1/reward.grpc.pb.h"
#include "fabric/v1/rollout.grpc.pb.h"

namespace fabric {

struct ConnectOptions {
  std::string address;    // host:port
  std::string token;      // sent as `authorization: Bearer <token>` when not empty
  std::string ca_file;    // PEM CA bundle: TLS, verifying the server against it; plaintext when empty
  double timeout_s = 0;   // deadline of every call (a whole stream is one call); none when 0
};

// A failed call, or one refused item of a stream (then request_id() names it and the stream went on).
class Error : public std::runtime_error {
 public:
  Error(grpc::StatusCode code, const std::string& message, std::string request_id = "", std::string reason = "",
        std::string field = "")
      : std::runtime_error(message),
        code_(code),
        request_id_(std::move(request_id)),
        reason_(std::move(reason)),
        field_(std::move(field)) {}
  explicit Error(const grpc::Status& status) : Error(status.error_code(), status.error_message()) {}

  grpc::StatusCode code() const { return code_; }
  const std::string& request_id() const { return request_id_; }
  const std::string& reason() const { return reason_; }
  const std::string& field() const { return field_; }

 private:
  grpc::StatusCode code_;
  std::string request_id_, reason_, field_;
};

// What a stream yields per response: a value, or the error that refused its request.
template <class T>
struct Outcome {
  std::string request_id;
  std::optional<T> value;
  std::optional<Error> error;
};

using GenerateOutcome = Outcome<v1::GenerateResponse>;
using ScoreOutcome = Outcome<v1::ScoreResponse>;

// The channel every client of one server shares (plaintext, or TLS when a CA file is given).
std::shared_ptr<grpc::Channel> MakeChannel(const ConnectOptions& options);

class RolloutClient {
 public:
  explicit RolloutClient(const ConnectOptions& options);

  // Streams the requests in on one Generate call and calls on_item for each sample or refused request, in
  // completion order. Throws fabric::Error when the call itself fails (deadline, auth, server gone).
  void Generate(const std::vector<v1::GenerateRequest>& requests,
                const std::function<void(GenerateOutcome)>& on_item);
  // Cancels live requests by id; returns the ids that were live.
  std::vector<std::string> Abort(const std::vector<std::string>& request_ids);
  v1::RolloutServiceGetServerInfoResponse ServerInfo();

 private:
  ConnectOptions options_;
  std::unique_ptr<v1::RolloutService::Stub> stub_;
};

class RewardClient {
 public:
  explicit RewardClient(const ConnectOptions& options);

  // Streams the requests in on one Score call; on_item gets each score or refused request as batches finish.
  void Score(const std::vector<v1::ScoreRequest>& requests, const std::function<void(ScoreOutcome)>& on_item);
  v1::RewardServiceGetServerInfoResponse ServerInfo();

 private:
  ConnectOptions options_;
  std::unique_ptr<v1::RewardService::Stub> stub_;
};

}  // namespace fabric
