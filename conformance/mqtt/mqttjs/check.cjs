// MQTT.js (the `mqtt` package from npm) against Wharf: QoS 0/1/2 round trips, a retained message,
// and with MQTT 5 user properties, over TCP or WebSocket. Exits 0 when every check passed.
//
//   NODE_PATH=target/conformance-node/node_modules node check.cjs --url mqtt://127.0.0.1:1883 --version 5
'use strict';

const mqtt = require('mqtt');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const url = arg('url', 'mqtt://127.0.0.1:1883');
const version = Number(arg('version', '4'));
const unique = `${process.pid}-${Date.now()}`;
const WAIT_MS = 10000;

function connect(clientId) {
  return new Promise((resolve, reject) => {
    const client = mqtt.connect(url, { clientId, protocolVersion: version, reconnectPeriod: 0, connectTimeout: WAIT_MS });
    client.once('connect', () => resolve(client));
    client.once('error', reject);
  });
}

function nextMessage(client, what) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no message for ${what} within ${WAIT_MS} ms`)), WAIT_MS);
    client.once('message', (topic, payload, packet) => {
      clearTimeout(timer);
      resolve({ topic, payload: payload.toString(), packet });
    });
  });
}

function check(condition, text) {
  if (!condition) throw new Error(text);
}

async function main() {
  const sub = await connect(`mqttjs-sub-${unique}`);
  const pub = await connect(`mqttjs-pub-${unique}`);
  for (const qos of [0, 1, 2]) {
    const topic = `mqttjs/${unique}/qos${qos}`;
    const granted = await sub.subscribeAsync(topic, { qos });
    check(granted[0].qos === qos, `QoS ${qos}: granted ${granted[0].qos}`);
    const message = nextMessage(sub, `QoS ${qos}`);
    const options = { qos };
    if (version === 5) options.properties = { userProperties: { origin: 'mqtt.js', n: String(qos) } };
    await pub.publishAsync(topic, `payload ${qos}`, options);
    const got = await message;
    check(got.topic === topic && got.payload === `payload ${qos}`, `QoS ${qos}: got ${got.topic} ${got.payload}`);
    check(got.packet.qos === qos, `QoS ${qos}: delivered at QoS ${got.packet.qos}`);
    if (version === 5) {
      const props = (got.packet.properties || {}).userProperties || {};
      check(props.origin === 'mqtt.js' && props.n === String(qos), `QoS ${qos}: user properties ${JSON.stringify(props)}`);
    }
  }
  const retainedTopic = `mqttjs/${unique}/retained`;
  await pub.publishAsync(retainedTopic, 'kept', { qos: 1, retain: true });
  const late = await connect(`mqttjs-late-${unique}`);
  const retained = nextMessage(late, 'the retained message');
  await late.subscribeAsync(`mqttjs/${unique}/#`, { qos: 1 });
  const got = await retained;
  check(got.topic === retainedTopic && got.payload === 'kept' && got.packet.retain, `retained: ${JSON.stringify(got)}`);
  await pub.publishAsync(retainedTopic, '', { qos: 1, retain: true });
  await Promise.all([sub.endAsync(), pub.endAsync(), late.endAsync()]);
  console.log(`passed MQTT.js checks (MQTT ${version === 5 ? '5' : '3.1.1'} over ${url})`);
}

main().then(
  () => process.exit(0),
  (error) => {
    console.error(`FAILED (MQTT ${version} over ${url}): ${error.message}`);
    process.exit(1);
  },
);
