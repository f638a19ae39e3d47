fn main() {
    println!("cistern: under construction");
}
