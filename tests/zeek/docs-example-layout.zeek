# The layout of this Zeek cluster, written by drover into the working directory of
# each of its nodes before every start, as Zeek's Supervisor would give it. Do not edit.
redef Cluster::manager_is_logger = F;

redef Cluster::nodes = {
	["logger"] = [$node_type=Cluster::LOGGER, $ip=127.0.0.1, $p=2201/tcp, $manager="manager", $metrics_port=9001/tcp],
	["manager"] = [$node_type=Cluster::MANAGER, $ip=127.0.0.1, $p=2200/tcp, $metrics_port=9000/tcp],
	["proxy-01"] = [$node_type=Cluster::PROXY, $ip=127.0.0.1, $p=2202/tcp, $manager="manager", $metrics_port=9002/tcp],
	["proxy-02"] = [$node_type=Cluster::PROXY, $ip=127.0.0.1, $p=2203/tcp, $manager="manager", $metrics_port=9005/tcp],
	["worker-01"] = [$node_type=Cluster::WORKER, $ip=127.0.0.1, $manager="manager", $metrics_port=9003/tcp],
	["worker-02"] = [$node_type=Cluster::WORKER, $ip=127.0.0.1, $manager="manager", $metrics_port=9004/tcp],
	["worker-03"] = [$node_type=Cluster::WORKER, $ip=127.0.0.1, $manager="manager", $metrics_port=9006/tcp],
	["worker-04"] = [$node_type=Cluster::WORKER, $ip=127.0.0.1, $manager="manager", $metrics_port=9007/tcp],
};
