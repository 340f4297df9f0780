import streamlit as st
st.title("score")
