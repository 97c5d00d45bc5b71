"""Drive ec2test with boto3, a client nobody on Hangar wrote.

Usage: boto3_smoke.py ENDPOINT_URL. Prints one JSON object of what boto3
saw; boto3_test.go checks it. Retries are off so that every error the
server sends reaches this script as boto3 parsed it.
"""

import base64
import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

AMI = "ami-0123456789abcdef0"
USER_DATA = "#!/bin/bash\necho hello from boto3\n"


def client_error(fn, **kwargs):
    """Call fn, which must fail, and return what boto3 made of the error."""
    try:
        fn(**kwargs)
    except ClientError as e:
        return {
            "code": e.response["Error"]["Code"],
            "message": e.response["Error"]["Message"],
            "status": e.response["ResponseMetadata"]["HTTPStatusCode"],
            "request_id": e.response["ResponseMetadata"].get("RequestId", ""),
        }
    return {"code": "no error"}


def states(changes):
    return [[c["InstanceId"], c["PreviousState"]["Name"], c["CurrentState"]["Name"]] for c in changes]


def main():
    ec2 = boto3.client(
        "ec2",
        endpoint_url=sys.argv[1],
        region_name="us-east-1",
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    out = {}
    launch = dict(
        ImageId=AMI,
        MinCount=12,
        MaxCount=12,
        InstanceType="t3.small",
        ClientToken="boto-intent-1",
        UserData=USER_DATA,  # boto3 base64-encodes it
        SubnetId="subnet-us-east-1b",
        SecurityGroupIds=["sg-0123456789abcdef0"],
        KeyName="ops",
        IamInstanceProfile={"Name": "hangar-worker"},
        MetadataOptions={"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 20, "VolumeType": "gp3"}}],
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "hangar:pool", "Value": "boto"}, {"Key": "Name", "Value": "w"}]},
            {"ResourceType": "volume", "Tags": [{"Key": "hangar:pool", "Value": "boto"}]},
        ],
    )
    r = ec2.run_instances(**launch)
    ids = [i["InstanceId"] for i in r["Instances"]]
    first = r["Instances"][0]
    out["run"] = {
        "ids": ids,
        "reservation": r["ReservationId"],
        "state": first["State"]["Name"],
        "zone": first["Placement"]["AvailabilityZone"],
        "launch_time_tz": first["LaunchTime"].utcoffset().total_seconds(),
        "tags": {t["Key"]: t["Value"] for t in first["Tags"]},
        "http_tokens": first["MetadataOptions"]["HttpTokens"],
        "hop_limit": first["MetadataOptions"]["HttpPutResponseHopLimit"],
        "profile_arn": first["IamInstanceProfile"]["Arn"],
        "private_ip": first["PrivateIpAddress"],
    }
    again = ec2.run_instances(**launch)
    out["rerun_ids"] = [i["InstanceId"] for i in again["Instances"]]

    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag:hangar:pool", "Values": ["boto"]}, {"Name": "instance-state-name", "Values": ["pending", "running"]}],
        PaginationConfig={"PageSize": 5},
    )
    out["pages"] = []
    for page in pages:
        out["pages"].append([i["InstanceId"] for res in page["Reservations"] for i in res["Instances"]])

    ec2.get_waiter("instance_running").wait(InstanceIds=ids[:2], WaiterConfig={"Delay": 1, "MaxAttempts": 5})

    console = ec2.get_console_output(InstanceId=ids[0])
    out["console"] = console.get("Output", "")  # botocore decodes the base64
    attr = ec2.describe_instance_attribute(InstanceId=ids[0], Attribute="userData")
    out["user_data"] = base64.b64decode(attr["UserData"]["Value"]).decode()

    ec2.create_tags(Resources=[ids[0]], Tags=[{"Key": "hangar:owner", "Value": "store-9"}])
    tagged = ec2.describe_instances(Filters=[{"Name": "tag-key", "Values": ["hangar:owner"]}])
    out["tagged"] = [i["InstanceId"] for res in tagged["Reservations"] for i in res["Instances"]]

    out["stop"] = states(ec2.stop_instances(InstanceIds=[ids[1]])["StoppingInstances"])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[ids[1]], WaiterConfig={"Delay": 1, "MaxAttempts": 5})
    out["start"] = states(ec2.start_instances(InstanceIds=[ids[1]])["StartingInstances"])
    out["terminate"] = states(ec2.terminate_instances(InstanceIds=ids)["TerminatingInstances"])
    ec2.get_waiter("instance_terminated").wait(InstanceIds=ids, WaiterConfig={"Delay": 1, "MaxAttempts": 5})

    images = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": ["hangar-worker-*"]}])["Images"]
    newest = max(images, key=lambda i: i["CreationDate"])
    out["images"] = sorted(i["ImageId"] for i in images)
    out["newest_image"] = newest["ImageId"]
    out["image_root"] = [newest["RootDeviceName"], newest["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]]
    out["zones"] = [z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]]

    out["errors"] = {
        "unknown_id": client_error(ec2.terminate_instances, InstanceIds=["i-0000000000000000a", "i-0000000000000000b"]),
        "mismatch": client_error(ec2.run_instances, **dict(launch, InstanceType="t3a.small")),
        "user_data": client_error(ec2.run_instances, ImageId=AMI, MinCount=1, MaxCount=1, UserData="x" * 16385),
        "capacity": client_error(ec2.run_instances, ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="x2iedn.32xlarge"),
        "throttled": client_error(ec2.describe_availability_zones),
        "page_size": client_error(ec2.describe_instances, MaxResults=3),
    }
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
