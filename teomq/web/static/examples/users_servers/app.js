// The users_servers web consumer: streams num_players and num_servers, says hello on request.
import { TeomqClient } from "/teomq.js";

const $ = (id) => document.getElementById(id);
const mq = new TeomqClient(); // this host's /ws, the broker of /info

mq.onstate = (state) => {
  $("connection").textContent = state;
  $("connection").className = state;
};

for (const name of ["num_players", "num_servers"]) {
  mq.stream(name, (data) => { $(name).textContent = data.slice(name.length + 1); });
  mq.subscribe(name);
}

$("hello-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    $("answer").textContent = await mq.call("hello", $("name").value);
  } catch (error) {
    $("answer").textContent = `error: ${error.message}`;
  }
});

mq.connect();
