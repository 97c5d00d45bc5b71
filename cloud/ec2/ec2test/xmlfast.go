package ec2test

import (
	"bytes"
	"encoding/xml"
	"strconv"
)

// A DescribeInstances answer of 1,000 instances is 1.9 MB of XML, and
// encoding/xml spends about 15 ms on it: a 10,000-instance listing spent
// most of its time here rather than in the client it tests. appendXML
// writes exactly what encoding/xml writes for the same value (see
// TestFastXMLIsEncodingXML, which compares the two on every field).

// fastXML is a response writeXML can write without encoding/xml.
type fastXML interface {
	appendXML(b []byte) []byte
}

func (r *describeInstancesResponse) appendXML(b []byte) []byte {
	b = appendElem(b, "requestId", r.RequestID)
	b = append(b, "<reservationSet>"...)
	for i := range r.Reservations {
		b = append(b, "<item>"...)
		b = r.Reservations[i].appendXML(b)
		b = append(b, "</item>"...)
	}
	b = append(b, "</reservationSet>"...)
	if r.NextToken != "" {
		b = appendElem(b, "nextToken", r.NextToken)
	}
	return b
}

func (r *reservationXML) appendXML(b []byte) []byte {
	b = appendElem(b, "reservationId", r.ReservationID)
	b = appendElem(b, "ownerId", r.OwnerID)
	b = appendGroups(b, r.Groups)
	b = append(b, "<instancesSet>"...)
	for i := range r.Instances {
		b = append(b, "<item>"...)
		b = r.Instances[i].appendXML(b)
		b = append(b, "</item>"...)
	}
	return append(b, "</instancesSet>"...)
}

func (x *instanceXML) appendXML(b []byte) []byte {
	b = appendElem(b, "instanceId", x.InstanceID)
	b = appendElem(b, "imageId", x.ImageID)
	b = append(b, "<instanceState>"...)
	b = appendInt(b, "code", x.State.Code)
	b = appendElem(b, "name", x.State.Name)
	b = append(b, "</instanceState>"...)
	b = appendElem(b, "privateDnsName", x.PrivateDNSName)
	b = appendElem(b, "dnsName", x.DNSName)
	b = appendElem(b, "reason", x.Reason)
	if x.KeyName != "" {
		b = appendElem(b, "keyName", x.KeyName)
	}
	b = appendInt(b, "amiLaunchIndex", x.AmiLaunchIndex)
	b = appendElem(b, "instanceType", x.InstanceType)
	b = appendElem(b, "launchTime", x.LaunchTime)
	b = append(b, "<placement>"...)
	b = appendElem(b, "availabilityZone", x.Placement.AvailabilityZone)
	b = appendElem(b, "groupName", x.Placement.GroupName)
	b = appendElem(b, "tenancy", x.Placement.Tenancy)
	b = append(b, "</placement><monitoring>"...)
	b = appendElem(b, "state", x.Monitoring.State)
	b = append(b, "</monitoring>"...)
	b = appendElem(b, "subnetId", x.SubnetID)
	b = appendElem(b, "vpcId", x.VpcID)
	if x.PrivateIPAddress != "" {
		b = appendElem(b, "privateIpAddress", x.PrivateIPAddress)
	}
	if x.IPAddress != "" {
		b = appendElem(b, "ipAddress", x.IPAddress)
	}
	b = appendBool(b, "sourceDestCheck", x.SourceDestCheck)
	b = appendGroups(b, x.Groups)
	if x.StateReason != nil {
		b = append(b, "<stateReason>"...)
		b = appendElem(b, "code", x.StateReason.Code)
		b = appendElem(b, "message", x.StateReason.Message)
		b = append(b, "</stateReason>"...)
	}
	b = appendElem(b, "architecture", x.Architecture)
	b = appendElem(b, "rootDeviceType", x.RootDeviceType)
	b = appendElem(b, "rootDeviceName", x.RootDeviceName)
	b = append(b, "<blockDeviceMapping>"...)
	for _, bd := range x.BlockDevices {
		b = append(b, "<item>"...)
		b = appendElem(b, "deviceName", bd.DeviceName)
		b = append(b, "<ebs>"...)
		b = appendElem(b, "volumeId", bd.Ebs.VolumeID)
		b = appendElem(b, "status", bd.Ebs.Status)
		b = appendElem(b, "attachTime", bd.Ebs.AttachTime)
		b = appendBool(b, "deleteOnTermination", bd.Ebs.DeleteOnTermination)
		b = append(b, "</ebs></item>"...)
	}
	b = append(b, "</blockDeviceMapping>"...)
	if x.InstanceLifecycle != "" {
		b = appendElem(b, "instanceLifecycle", x.InstanceLifecycle)
	}
	if x.SpotRequestID != "" {
		b = appendElem(b, "spotInstanceRequestId", x.SpotRequestID)
	}
	b = appendElem(b, "virtualizationType", x.VirtualizationType)
	b = appendElem(b, "clientToken", x.ClientToken)
	b = append(b, "<tagSet>"...)
	for _, t := range x.Tags {
		b = append(b, "<item>"...)
		b = appendElem(b, "key", t.Key)
		b = appendElem(b, "value", t.Value)
		b = append(b, "</item>"...)
	}
	b = append(b, "</tagSet>"...)
	b = appendElem(b, "hypervisor", x.Hypervisor)
	if x.IamInstanceProfile != nil {
		b = append(b, "<iamInstanceProfile>"...)
		b = appendElem(b, "arn", x.IamInstanceProfile.Arn)
		b = appendElem(b, "id", x.IamInstanceProfile.ID)
		b = append(b, "</iamInstanceProfile>"...)
	}
	b = appendBool(b, "ebsOptimized", x.EbsOptimized)
	b = appendBool(b, "enaSupport", x.EnaSupport)
	m := &x.MetadataOptions
	b = append(b, "<metadataOptions>"...)
	b = appendElem(b, "state", m.State)
	b = appendElem(b, "httpTokens", m.HTTPTokens)
	b = appendInt(b, "httpPutResponseHopLimit", m.HTTPPutResponseHopLimit)
	b = appendElem(b, "httpEndpoint", m.HTTPEndpoint)
	b = appendElem(b, "httpProtocolIpv6", m.HTTPProtocolIPv6)
	b = appendElem(b, "instanceMetadataTags", m.InstanceMetadataTags)
	b = append(b, "</metadataOptions>"...)
	b = appendElem(b, "platformDetails", x.PlatformDetails)
	return appendElem(b, "usageOperation", x.UsageOperation)
}

// appendGroups writes a groupSet, which encoding/xml writes (empty) even
// when there are no groups.
func appendGroups(b []byte, groups []groupXML) []byte {
	b = append(b, "<groupSet>"...)
	for _, g := range groups {
		b = append(b, "<item>"...)
		b = appendElem(b, "groupId", g.GroupID)
		b = appendElem(b, "groupName", g.GroupName)
		b = append(b, "</item>"...)
	}
	return append(b, "</groupSet>"...)
}

func appendElem(b []byte, name, value string) []byte {
	b = append(b, '<')
	b = append(b, name...)
	b = append(b, '>')
	b = appendEscaped(b, value)
	b = append(b, "</"...)
	b = append(b, name...)
	return append(b, '>')
}

func appendInt(b []byte, name string, v int) []byte {
	return appendElem(b, name, strconv.Itoa(v))
}

func appendBool(b []byte, name string, v bool) []byte {
	return appendElem(b, name, strconv.FormatBool(v))
}

// appendEscaped escapes s as encoding/xml does: a value of plain
// printable ASCII, nearly every one, is copied as it is; any other goes
// through xml.EscapeText, which is what encoding/xml's own escaping does.
func appendEscaped(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if !plainXML[s[i]] {
			var buf bytes.Buffer
			_ = xml.EscapeText(&buf, []byte(s)) // a bytes.Buffer does not fail
			return append(b, buf.Bytes()...)
		}
	}
	return append(b, s...)
}

// plainXML: the bytes encoding/xml copies as they are.
var plainXML = func() (t [256]bool) {
	for c := 0x20; c < 0x7f; c++ {
		t[c] = true
	}
	for _, c := range `<>&'"` {
		t[c] = false
	}
	return t
}()
