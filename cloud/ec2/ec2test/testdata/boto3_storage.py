"""Drive ec2test's key pairs, volumes, snapshots and images with boto3.

Usage: boto3_storage.py ENDPOINT_URL PUBLIC_KEY. The server serves
us-east-1 and eu-west-1 and keeps volumes and snapshots pending for a
moment, so that boto3's own waiters have something to wait for. Prints one
JSON object of what boto3 saw; boto3_test.go checks it.
"""

import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

AMI = "ami-0123456789abcdef0"
# The waiters poll every 0.2s instead of every 15s.
FAST = {"Delay": 0.2, "MaxAttempts": 100}


def client_error(fn, **kwargs):
    """Call fn, which must fail, and return what boto3 made of the error."""
    try:
        fn(**kwargs)
    except ClientError as e:
        return {
            "code": e.response["Error"]["Code"],
            "message": e.response["Error"]["Message"],
            "status": e.response["ResponseMetadata"]["HTTPStatusCode"],
        }
    return {"code": "no error"}


def tags(resource_type):
    return [{"ResourceType": resource_type, "Tags": [{"Key": "hangar:staging", "Value": "boto"}]}]


def tag_map(obj):
    return {t["Key"]: t["Value"] for t in obj.get("Tags", [])}


def main():
    url, public_key = sys.argv[1], sys.argv[2]
    cfg = Config(retries={"mode": "standard", "total_max_attempts": 1})
    east = boto3.client("ec2", endpoint_url=url, region_name="us-east-1", config=cfg)
    west = boto3.client("ec2", endpoint_url=url, region_name="eu-west-1", config=cfg)
    nowhere = boto3.client("ec2", endpoint_url=url, region_name="ap-south-1", config=cfg)
    out = {"errors": {}}
    errors = out["errors"]

    kp = east.import_key_pair(KeyName="staging", PublicKeyMaterial=public_key.encode(), TagSpecifications=tags("key-pair"))
    described = east.describe_key_pairs(KeyNames=["staging"], IncludePublicKey=True)["KeyPairs"][0]
    out["key"] = {
        "id": kp["KeyPairId"],
        "fingerprint": kp["KeyFingerprint"],
        "described_id": described["KeyPairId"],
        "type": described["KeyType"],
        "public_key": described["PublicKey"],
        "tags": tag_map(described),
    }
    errors["duplicate_key"] = client_error(east.import_key_pair, KeyName="staging", PublicKeyMaterial=public_key.encode())
    errors["unknown_key"] = client_error(west.run_instances, ImageId=AMI, MinCount=1, MaxCount=1, KeyName="staging")

    inst = east.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, KeyName="staging", SubnetId="subnet-us-east-1a")["Instances"][0]
    iid = inst["InstanceId"]
    out["key_name"] = inst["KeyName"]
    other = east.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, SubnetId="subnet-us-east-1b")["Instances"][0]["InstanceId"]
    east.get_waiter("instance_running").wait(InstanceIds=[iid, other], WaiterConfig=FAST)

    vol = east.create_volume(AvailabilityZone="us-east-1a", Size=2, TagSpecifications=tags("volume"), ClientToken="boto-volume")
    vid = vol["VolumeId"]
    out["volume"] = {"id": vid, "state": vol["State"], "size": vol["Size"], "type": vol["VolumeType"], "tags": tag_map(vol)}
    out["volume_again"] = east.create_volume(AvailabilityZone="us-east-1a", Size=2, TagSpecifications=tags("volume"), ClientToken="boto-volume")["VolumeId"]
    east.get_waiter("volume_available").wait(VolumeIds=[vid], WaiterConfig=FAST)
    errors["zone_mismatch"] = client_error(east.attach_volume, VolumeId=vid, InstanceId=other, Device="/dev/sdf")
    att = east.attach_volume(VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    out["attach"] = [att["State"], att["Device"], att["InstanceId"]]
    east.get_waiter("volume_in_use").wait(VolumeIds=[vid], WaiterConfig=FAST)
    v = east.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [iid]}])["Volumes"][0]
    out["attached"] = [v["VolumeId"], v["State"], v["Attachments"][0]["State"], v["Attachments"][0]["Device"]]
    errors["delete_attached"] = client_error(east.delete_volume, VolumeId=vid)

    snaps = [
        east.create_snapshot(VolumeId=vid, Description="boto %d" % i, TagSpecifications=tags("snapshot"))
        for i in range(7)
    ]
    out["snapshot_state"] = snaps[0]["State"]
    ids = [s["SnapshotId"] for s in snaps]
    east.get_waiter("snapshot_completed").wait(SnapshotIds=ids, WaiterConfig=FAST)
    pages = east.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], PaginationConfig={"PageSize": 5})
    out["snapshot_ids"] = ids
    out["snapshot_pages"] = [[s["SnapshotId"] for s in page["Snapshots"]] for page in pages]
    errors["smaller_than_snapshot"] = client_error(east.create_volume, AvailabilityZone="us-east-1a", SnapshotId=ids[0], Size=1)

    # boto3 adds PresignedUrl and DestinationRegion itself.
    cp = west.copy_snapshot(SourceRegion="us-east-1", SourceSnapshotId=ids[0], Description="to the west", TagSpecifications=tags("snapshot"))
    west.get_waiter("snapshot_completed").wait(SnapshotIds=[cp["SnapshotId"]], WaiterConfig=FAST)
    copied = west.describe_snapshots(SnapshotIds=[cp["SnapshotId"]])["Snapshots"][0]
    out["copy"] = {
        "id": cp["SnapshotId"],
        "size": copied["VolumeSize"],
        "state": copied["State"],
        "progress": copied["Progress"],
        "description": copied["Description"],
        "tags": tag_map(copied),
    }
    errors["copy_in_east"] = client_error(east.describe_snapshots, SnapshotIds=[cp["SnapshotId"]])
    west_vol = west.create_volume(AvailabilityZone="eu-west-1b", SnapshotId=cp["SnapshotId"])
    west.get_waiter("volume_available").wait(VolumeIds=[west_vol["VolumeId"]], WaiterConfig=FAST)
    out["west_volume_size"] = west_vol["Size"]

    image = east.create_image(InstanceId=iid, Name="boto-image", Description="from boto3", TagSpecifications=tags("image"))
    east.get_waiter("image_available").wait(ImageIds=[image["ImageId"]], WaiterConfig=FAST)
    west_image = west.copy_image(SourceRegion="us-east-1", SourceImageId=image["ImageId"], Name="boto-image", ClientToken="boto-copy", CopyImageTags=True)
    west.get_waiter("image_available").wait(ImageIds=[west_image["ImageId"]], WaiterConfig=FAST)
    wi = west.describe_images(ImageIds=[west_image["ImageId"]])["Images"][0]
    out["image_copy"] = {
        "id": wi["ImageId"],
        "source": image["ImageId"],
        "name": wi["Name"],
        "root": wi["RootDeviceName"],
        "devices": [[b["DeviceName"], b["Ebs"]["SnapshotId"], b["Ebs"]["VolumeSize"]] for b in wi["BlockDeviceMappings"]],
        "tags": tag_map(wi),
    }
    errors["duplicate_image"] = client_error(west.copy_image, SourceRegion="us-east-1", SourceImageId=image["ImageId"], Name="boto-image")
    registered = west.register_image(
        Name="boto-registered",
        RootDeviceName="/dev/xvda",
        Architecture="x86_64",
        VirtualizationType="hvm",
        EnaSupport=True,
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": cp["SnapshotId"], "VolumeSize": 8, "VolumeType": "gp3", "DeleteOnTermination": True}}],
    )
    west.get_waiter("image_available").wait(ImageIds=[registered["ImageId"]], WaiterConfig=FAST)
    ri = west.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": ["boto-registered"]}])["Images"][0]
    out["registered"] = [registered["ImageId"], ri["ImageId"], ri["VirtualizationType"], ri["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]]
    west.run_instances(ImageId=registered["ImageId"], MinCount=1, MaxCount=1)
    west.deregister_image(ImageId=registered["ImageId"])

    out["detach"] = east.detach_volume(VolumeId=vid)["State"]
    east.get_waiter("volume_available").wait(VolumeIds=[vid], WaiterConfig=FAST)
    east.delete_volume(VolumeId=vid)
    east.get_waiter("volume_deleted").wait(VolumeIds=[vid], WaiterConfig=FAST)
    east.delete_snapshot(SnapshotId=ids[-1])
    east.delete_tags(Resources=[ids[0]], Tags=[{"Key": "hangar:staging"}])
    out["untagged"] = tag_map(east.describe_snapshots(SnapshotIds=[ids[0]])["Snapshots"][0])
    east.delete_key_pair(KeyName="staging")
    errors["deleted_key"] = client_error(east.describe_key_pairs, KeyNames=["staging"])
    errors["unknown_region"] = client_error(nowhere.describe_volumes)
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
