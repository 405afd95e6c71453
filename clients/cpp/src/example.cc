// Streams Generate requests to a rollout server, scores every sample with Score on a reward server, and prints
// one JSON line per event. The TypeScript and Go examples take the same flags and print the same lines.
//
//   fabric_example --rollout HOST:PORT --reward HOST:PORT [--prompt P --ground-truth G]...
//       [--max-new-tokens N] [--n N] [--temperature T] [--reward-name math] [--token T] [--ca-file F]
//       [--timeout-s S] [--bad-request]
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "fabric/client.h"

namespace {

std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

void PrintError(const char* event, const char* rpc, const fabric::Error& e) {
  std::cout << "{\"event\":\"" << event << "\",\"rpc\":\"" << rpc << "\"";
  if (!e.request_id().empty()) std::cout << ",\"request_id\":" << Quote(e.request_id());
  std::cout << ",\"code\":" << static_cast<int>(e.code()) << ",\"message\":" << Quote(e.what()) << "}" << std::endl;
}

struct Args {
  std::string rollout, reward, reward_name = "math", token, ca_file;
  std::vector<std::string> prompts, truths;
  int max_new_tokens = 16, n = 1;
  float temperature = 0;
  double timeout_s = 0;
  bool bad_request = false;
};

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (flag == "--bad-request") {
      a.bad_request = true;
      continue;
    }
    if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value");
    std::string value = argv[++i];
    if (flag == "--rollout") a.rollout = value;
    else if (flag == "--reward") a.reward = value;
    else if (flag == "--prompt") a.prompts.push_back(value);
    else if (flag == "--ground-truth") a.truths.push_back(value);
    else if (flag == "--max-new-tokens") a.max_new_tokens = std::stoi(value);
    else if (flag == "--n") a.n = std::stoi(value);
    else if (flag == "--temperature") a.temperature = std::stof(value);
    else if (flag == "--reward-name") a.reward_name = value;
    else if (flag == "--token") a.token = value;
    else if (flag == "--ca-file") a.ca_file = value;
    else if (flag == "--timeout-s") a.timeout_s = std::stod(value);
    else throw std::invalid_argument("unknown flag " + flag);
  }
  if (a.rollout.empty() || a.reward.empty())
    throw std::invalid_argument("--rollout HOST:PORT and --reward HOST:PORT are required");
  if (a.prompts.empty() && a.truths.empty()) {
    a.prompts = {"Add 3 and 4.\n", "Add 12 and 30.\n"};
    a.truths = {"7", "42"};
  }
  if (a.prompts.size() != a.truths.size()) throw std::invalid_argument("give one --ground-truth per --prompt");
  return a;
}

size_t TaskIndex(const std::string& request_id) { return std::stoul(request_id.substr(request_id.find('-') + 1)); }

int Run(const Args& args) {
  fabric::ConnectOptions common{"", args.token, args.ca_file, args.timeout_s};
  fabric::ConnectOptions rollout_options = common, reward_options = common;
  rollout_options.address = args.rollout;
  reward_options.address = args.reward;
  fabric::RolloutClient rollout(rollout_options);
  fabric::RewardClient reward(reward_options);

  std::vector<fabric::v1::GenerateRequest> requests;
  for (size_t i = 0; i < args.prompts.size(); ++i) {
    fabric::v1::GenerateRequest request;
    request.set_request_id("task-" + std::to_string(i));
    request.set_prompt(args.prompts[i]);
    request.mutable_sampling()->set_max_new_tokens(args.max_new_tokens);
    request.mutable_sampling()->set_num_return_sequences(args.n);
    request.mutable_sampling()->set_temperature(args.temperature);
    requests.push_back(request);
  }
  // Neither prompt nor prompt_token_ids: the server refuses this item alone and the stream goes on.
  if (args.bad_request) requests.emplace_back().set_request_id("bad-0");

  std::vector<fabric::v1::GenerateResponse> samples;
  int errors = 0;
  rollout.Generate(requests, [&](fabric::GenerateOutcome item) {
    if (item.error) {
      ++errors;
      PrintError("error", "Generate", *item.error);
    } else {
      samples.push_back(std::move(*item.value));
    }
  });

  auto key = [](const fabric::v1::GenerateResponse& s) {
    return s.request_id() + "/" + std::to_string(s.sample_index());
  };
  std::vector<fabric::v1::ScoreRequest> score_requests;
  for (const auto& s : samples) {
    fabric::v1::ScoreRequest request;
    request.set_request_id(key(s));
    request.set_prompt(args.prompts[TaskIndex(s.request_id())]);
    request.set_response(s.text());
    request.set_ground_truth(args.truths[TaskIndex(s.request_id())]);
    request.set_reward_name(args.reward_name);
    *request.mutable_response_token_ids() = s.token_ids();
    score_requests.push_back(request);
  }
  std::map<std::string, float> scores;
  reward.Score(score_requests, [&](fabric::ScoreOutcome item) {
    if (item.error) {
      ++errors;
      PrintError("error", "Score", *item.error);
    } else {
      scores[item.request_id] = item.value->score();
    }
  });

  std::sort(samples.begin(), samples.end(), [&](const auto& a, const auto& b) { return key(a) < key(b); });
  for (const auto& s : samples) {
    std::ostringstream line;
    line.precision(9);
    line << "{\"event\":\"sample\",\"request_id\":" << Quote(s.request_id()) << ",\"sample_index\":" << s.sample_index()
         << ",\"token_ids\":[";
    for (int i = 0; i < s.token_ids_size(); ++i) line << (i ? "," : "") << s.token_ids(i);
    line << "],\"text\":" << Quote(s.text()) << ",\"finish_reason\":"
         << Quote(fabric::v1::FinishReason_Name(s.finish_reason()).substr(sizeof("FINISH_REASON_") - 1))
         << ",\"weight_version\":" << s.weight_version() << ",\"score\":";
    auto found = scores.find(key(s));
    if (found == scores.end()) line << "null";
    else line << found->second;
    std::cout << line.str() << "}" << std::endl;
  }

  if (args.bad_request) {
    // A call-level error: Abort needs at least one id, so the server answers INVALID_ARGUMENT.
    try {
      rollout.Abort({});
    } catch (const fabric::Error& e) {
      PrintError("call_error", "Abort", e);
    }
  }
  std::cout << "{\"event\":\"summary\",\"samples\":" << samples.size() << ",\"scored\":" << scores.size()
            << ",\"errors\":" << errors << "}" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(Parse(argc, argv));
  } catch (const fabric::Error& e) {
    std::cout << "{\"event\":\"fatal\",\"code\":" << static_cast<int>(e.code()) << ",\"message\":" << Quote(e.what())
              << "}" << std::endl;
  } catch (const std::exception& e) {
    std::cout << "{\"event\":\"fatal\",\"code\":2,\"message\":" << Quote(e.what()) << "}" << std::endl;
  }
  return 1;
}
