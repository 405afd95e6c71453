export * from "./client.js";
export * from "./gen/fabric/v1/common_pb.js";
export * from "./gen/fabric/v1/rollout_pb.js";
export * from "./gen/fabric/v1/reward_pb.js";
