#include "fabric/client.h"

#include <chrono>
#include <exception>
#include <fstream>
#include <sstream>
#include <thread>

namespace fabric {
namespace {

constexpr int kMaxMessageBytes = 64 * 1024 * 1024;  // as the Python servers allow

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(grpc::StatusCode::INVALID_ARGUMENT, "ca_file: cannot read " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// A context carrying the options' deadline and bearer token.
std::unique_ptr<grpc::ClientContext> MakeContext(const ConnectOptions& options) {
  auto context = std::make_unique<grpc::ClientContext>();
  if (options.timeout_s > 0) {
    std::chrono::duration<double> timeout(options.timeout_s);
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::duration_cast<std::chrono::microseconds>(timeout));
  }
  if (!options.token.empty()) context->AddMetadata("authorization", "Bearer " + options.token);
  return context;
}

template <class Response>
Outcome<Response> ToOutcome(Response&& response) {
  Outcome<Response> outcome{response.request_id(), std::nullopt, std::nullopt};
  if (response.has_error()) {
    const auto& e = response.error();
    outcome.error.emplace(static_cast<grpc::StatusCode>(e.code()), e.message(), response.request_id(), e.reason(),
                          e.field());
  } else {
    outcome.value.emplace(std::move(response));
  }
  return outcome;
}

// One bidi call: a writer thread sends every request while this thread reads the responses as they come.
template <class Request, class Response, class StartCall>
void RunStream(const ConnectOptions& options, StartCall start, const std::vector<Request>& requests,
               const std::function<void(Outcome<Response>)>& on_item) {
  auto context = MakeContext(options);
  auto stream = start(context.get());
  std::thread writer([&] {
    for (const auto& request : requests) {
      if (!stream->Write(request)) break;  // the call ended; Finish() below says why
    }
    stream->WritesDone();
  });
  std::exception_ptr callback_failure;
  try {
    Response response;
    while (stream->Read(&response)) on_item(ToOutcome(std::move(response)));
  } catch (...) {  // on_item threw: end the call so the writer thread stops, then hand the exception on
    callback_failure = std::current_exception();
    context->TryCancel();
  }
  writer.join();
  grpc::Status status = stream->Finish();
  if (callback_failure) std::rethrow_exception(callback_failure);
  if (!status.ok()) throw Error(status);
}

}  // namespace

std::shared_ptr<grpc::Channel> MakeChannel(const ConnectOptions& options) {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (options.ca_file.empty()) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ReadFile(options.ca_file);
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  return grpc::CreateCustomChannel(options.address, credentials, args);
}

RolloutClient::RolloutClient(const ConnectOptions& options)
    : options_(options), stub_(v1::RolloutService::NewStub(MakeChannel(options))) {}

void RolloutClient::Generate(const std::vector<v1::GenerateRequest>& requests,
                             const std::function<void(GenerateOutcome)>& on_item) {
  RunStream<v1::GenerateRequest, v1::GenerateResponse>(
      options_, [&](grpc::ClientContext* context) { return stub_->Generate(context); }, requests, on_item);
}

std::vector<std::string> RolloutClient::Abort(const std::vector<std::string>& request_ids) {
  auto context = MakeContext(options_);
  v1::AbortRequest request;
  for (const auto& id : request_ids) request.add_request_ids(id);
  v1::AbortResponse response;
  grpc::Status status = stub_->Abort(context.get(), request, &response);
  if (!status.ok()) throw Error(status);
  return {response.aborted_request_ids().begin(), response.aborted_request_ids().end()};
}

v1::RolloutServiceGetServerInfoResponse RolloutClient::ServerInfo() {
  auto context = MakeContext(options_);
  v1::RolloutServiceGetServerInfoResponse response;
  grpc::Status status = stub_->GetServerInfo(context.get(), {}, &response);
  if (!status.ok()) throw Error(status);
  return response;
}

RewardClient::RewardClient(const ConnectOptions& options)
    : options_(options), stub_(v1::RewardService::NewStub(MakeChannel(options))) {}

void RewardClient::Score(const std::vector<v1::ScoreRequest>& requests,
                         const std::function<void(ScoreOutcome)>& on_item) {
  RunStream<v1::ScoreRequest, v1::ScoreResponse>(
      options_, [&](grpc::ClientContext* context) { return stub_->Score(context); }, requests, on_item);
}

v1::RewardServiceGetServerInfoResponse RewardClient::ServerInfo() {
  auto context = MakeContext(options_);
  v1::RewardServiceGetServerInfoResponse response;
  grpc::Status status = stub_->GetServerInfo(context.get(), {}, &response);
  if (!status.ok()) throw Error(status);
  return response;
}

}  // namespace fabric
